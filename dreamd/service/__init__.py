"""The service around the cycle: systemd notification (notify), signals, pause flag and pidfile
(control), SIGHUP reload rules (reload), when cycles run (schedule), atomic checkpoints
(checkpoint). Each module stands alone; the daemon loop wires them together."""
