"""Sign-in of the production stack's Airflow UI and API (FAB auth manager, docker-compose.yaml).

Default: accounts in Airflow's database (AUTH_DB). The init service creates ``admin`` (role
Admin) and ``listener`` (role User: it may trigger runs) with the passwords of ``.env``; add
people with ``docker-compose exec api-server airflow users create ...``.

A hospital's LDAP or Active Directory: set ``RADDEPLOY_LDAP_SERVER`` (and the variables below,
all in deploy/env.example) and restart the api-server. People then sign in with their directory
account; their roles follow their directory groups (``RADDEPLOY_LDAP_ROLES``), re-read at each
sign-in. The ``listener`` account stays a database account. docs/production.md "Accounts".
"""

import json
import os

from flask_appbuilder.const import AUTH_DB, AUTH_LDAP

WTF_CSRF_ENABLED = True
AUTH_TYPE = AUTH_DB

if os.environ.get("RADDEPLOY_LDAP_SERVER"):
    AUTH_TYPE = AUTH_LDAP
    AUTH_LDAP_SERVER = os.environ["RADDEPLOY_LDAP_SERVER"]  # ldaps://dc1.hospital.example:636
    AUTH_LDAP_USE_TLS = os.environ.get("RADDEPLOY_LDAP_STARTTLS", "false").lower() == "true"
    AUTH_LDAP_TLS_CACERTFILE = os.environ.get("RADDEPLOY_LDAP_CA_FILE", "/etc/ssl/certs/ca-certificates.crt")
    AUTH_LDAP_BIND_USER = os.environ.get("RADDEPLOY_LDAP_BIND_USER", "")  # a read-only service account
    AUTH_LDAP_BIND_PASSWORD = os.environ.get("RADDEPLOY_LDAP_BIND_PASSWORD", "")
    AUTH_LDAP_SEARCH = os.environ.get("RADDEPLOY_LDAP_SEARCH", "")  # ou=people,dc=hospital,dc=example
    AUTH_LDAP_UID_FIELD = os.environ.get("RADDEPLOY_LDAP_UID_FIELD", "sAMAccountName")  # AD; uid for OpenLDAP
    AUTH_LDAP_GROUP_FIELD = os.environ.get("RADDEPLOY_LDAP_GROUP_FIELD", "memberOf")
    AUTH_LDAP_FIRSTNAME_FIELD = "givenName"
    AUTH_LDAP_LASTNAME_FIELD = "sn"
    AUTH_LDAP_EMAIL_FIELD = "mail"
    # {"cn=rt-physicists,ou=groups,dc=hospital,dc=example": ["User"], "cn=rt-it,...": ["Admin"]}
    AUTH_ROLES_MAPPING = json.loads(os.environ.get("RADDEPLOY_LDAP_ROLES") or "{}")
    AUTH_ROLES_SYNC_AT_LOGIN = True
    AUTH_USER_REGISTRATION = True  # a directory user gets an Airflow account at first sign-in ...
    AUTH_USER_REGISTRATION_ROLE = os.environ.get("RADDEPLOY_LDAP_DEFAULT_ROLE", "Public")  # ... that sees nothing unless mapped
