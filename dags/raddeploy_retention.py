"""Airflow DAG file: ``raddeploy_retention``, the provider's maintenance DAG (retention, audit export).

Hourly by default (``RADDEPLOY_RETENTION_SCHEDULE``; ``off``: only when triggered by hand). It
imports nothing heavy: the operator's work is done at execute.
"""

from raddeploy_provider.config import load_settings
from raddeploy_provider.operators.retention import retention_dag

dag = retention_dag(load_settings())
