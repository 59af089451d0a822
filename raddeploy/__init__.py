"""The ``raddeploy`` application: the command line and the embedded deployment.

The top layer: it composes the listener (``listener``) and the Airflow side
(``raddeploy_provider``), which never import each other. See docs/architecture.md.
"""
