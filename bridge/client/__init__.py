"""The Colab side, in five layers; each imports only the ones below it (tests/test_layers.py):

    plugins/    what MLflow sees: tracking, artifact, logged-model, registry and auth plugins
    connect.py  bridge.connect(), sync, queue: one journal, one link and one sender for the process
    delivery/   the sender loop and the table of what each journaled op becomes on the server
    journal/    SQLite (durable), the intake of metric points, the spool of files: where everything waits
    link/       the one way to the server (Link over a Transport), and discovery of its URL

options.py holds every client setting; errors are bridge.errors (LinkError, UndeliverableError, …).
"""
