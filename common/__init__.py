"""dermafed: common."""
