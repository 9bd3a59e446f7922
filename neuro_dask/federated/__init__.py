"""Federated fine-tuning: FedAvg rounds over participants that keep their data, with secure
aggregation (secure_aggregation.py) and optional differential privacy (dp.py). See
docs/privacy.md, "Federated fine-tuning"."""
