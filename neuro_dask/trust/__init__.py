"""Pure trust cores: validation, quorums, reputation, replication, hedging. Events in, decisions out."""
