"""dermafed: dermafed."""
