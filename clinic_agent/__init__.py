"""dermafed: clinic_agent."""
