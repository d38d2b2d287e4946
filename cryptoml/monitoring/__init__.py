"""Model monitoring: feature drift (PSI) and performance triggers over the runner's predictions."""
