"""A real OpenLDAP directory (Debian's slapd) for sign-in tests: a hospital's LDAP/AD in small.

:class:`Directory` writes a ``slapd.conf`` and an LDIF into a folder, loads the entries with
``slapadd`` and runs ``slapd`` on a free port of every interface (containers reach it through
their network's gateway). People are ``uid=<name>,ou=people,<suffix>`` with a password; their
groups are named in the attribute ``seeAlso`` (the group DNs, as Active Directory's
``memberOf`` lists them; OpenLDAP computes memberOf only with an overlay).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from peers import free_port, wait_port

SUFFIX = "dc=hospital,dc=test"
ADMIN_DN = f"cn=admin,{SUFFIX}"

CONF = """include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {folder}/slapd.pid
database mdb
maxsize 10485760
directory {folder}/db
suffix "{suffix}"
rootdn "{admin}"
rootpw {password}
access to attrs=userPassword by anonymous auth by * none
access to * by * read
"""


class Directory:
    def __init__(self, folder: Path, admin_password: str, people: dict[str, tuple[str, list[str]]]) -> None:
        """``people``: uid -> (password, group cns). Groups are ``cn=<cn>,ou=groups,<suffix>``."""
        self.folder = folder
        self.port = free_port()
        self.admin_password = admin_password
        (folder / "db").mkdir(parents=True)
        conf = folder / "slapd.conf"
        conf.write_text(CONF.format(folder=folder, suffix=SUFFIX, admin=ADMIN_DN, password=admin_password))
        entries = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Hospital\ndc: hospital",
                   f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people",
                   f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups"]
        for group in sorted({g for _, groups in people.values() for g in groups}):
            members = [f"member: {self.person_dn(uid)}" for uid, (_, groups) in people.items() if group in groups]
            entries.append(f"dn: {self.group_dn(group)}\nobjectClass: groupOfNames\ncn: {group}\n" + "\n".join(members))
        for uid, (password, groups) in people.items():
            entries.append(f"dn: {self.person_dn(uid)}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
                           f"givenName: {uid}\nmail: {uid}@hospital.test\nuserPassword: {password}"
                           + "".join(f"\nseeAlso: {self.group_dn(g)}" for g in groups))
        ldif = folder / "entries.ldif"
        ldif.write_text("\n\n".join(entries) + "\n")
        loaded = subprocess.run(["/usr/sbin/slapadd", "-f", str(conf), "-l", str(ldif)], capture_output=True, text=True)
        assert loaded.returncode == 0, loaded.stderr
        self.proc = subprocess.Popen(["/usr/sbin/slapd", "-d", "0", "-f", str(conf), "-h", f"ldap://0.0.0.0:{self.port}/"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_port(self.port, timeout=60)
        except TimeoutError:
            self.proc.kill()
            raise AssertionError(f"slapd did not listen on {self.port}: {self.proc.communicate()[1][-2000:]}") from None

    @staticmethod
    def person_dn(uid: str) -> str:
        return f"uid={uid},ou=people,{SUFFIX}"

    @staticmethod
    def group_dn(cn: str) -> str:
        return f"cn={cn},ou=groups,{SUFFIX}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
