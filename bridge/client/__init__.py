"""The Colab side: discovery, the durable journal, the sender, and MLflow's store/artifact/auth plugins.

    training thread ──▶ store.py / artifacts.py ──▶ journal.py (SQLite) ──▶ sender.py ──▶ server
"""
