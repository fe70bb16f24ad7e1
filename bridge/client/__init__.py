"""The Colab side: discovery, the durable journal, the sender, and MLflow's store/artifact/auth plugins.

    training thread ──▶ store.py / artifacts.py ──▶ journal.py (+ intake.py for metric points) ──▶ sender.py ──▶ server
                         (MLflow plugins)            (SQLite, durable)                              (batch, backoff)
    connect.py wires it up: secrets ──▶ discovery.py ──▶ probe ──▶ MLFLOW_TRACKING_URI=bridge+https://…
"""
