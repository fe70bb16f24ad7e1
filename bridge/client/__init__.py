"""The Colab side: discovery, the durable journal, the sender, and MLflow's store/artifact/registry/auth plugins.

    training thread ──▶ store.py · artifacts.py · models.py · registry.py   (MLflow plugins)
                          │
                          ▼
                        journal.py (+ intake.py for metric points, spool.py for files)   SQLite, durable
                          │
                          ▼
                        sender.py ── batch.py, operations.py, heartbeat.py ──▶ link.py ──▶ server
                                                                                 ▲
    store/registry reads, auth, connect() ─────────────────────────────────────┘
    connect.py wires it up: secrets ──▶ discovery.py ──▶ Link.probe ──▶ MLFLOW_TRACKING_URI=bridge+https://…
    options.py holds every client setting; errors are bridge.errors (LinkError, UndeliverableError, …).
"""
