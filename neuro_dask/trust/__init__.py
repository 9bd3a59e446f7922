"""Pure trust cores: validation, quorums, reputation, replication, hedging, the decisions of one layer
call (layer_quorums), late checks, verdicts and governed parameters. Events in, decisions out."""
