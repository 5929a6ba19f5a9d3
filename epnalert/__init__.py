"""epnalert: the daily alert about experiments (EPNs) nobody has claimed."""
