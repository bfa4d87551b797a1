"""uad-node models: volume in, anomaly map out (preprocessing, cDDPM, training, evaluation)."""
