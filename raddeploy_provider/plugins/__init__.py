"""The provider's Airflow plugin (entry point ``airflow.plugins``): routes the API server serves
besides Airflow's own, each checked as Airflow's API checks its routes (:mod:`.previews`)."""
