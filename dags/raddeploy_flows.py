"""Airflow DAG file: one DAG per flow file in RADDEPLOY_FLOWS (see raddeploy_provider.dag_factory)."""

from raddeploy_provider.config import load_settings
from raddeploy_provider.dag_factory import build_all

globals().update(build_all(load_settings().flows_dir))
