"""`pipeline sweep`: a grid of settings x seeds, every trial a full training run, on Ray Tune (driver.py)."""
