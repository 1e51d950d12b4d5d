"""dermafed: aggregator."""
