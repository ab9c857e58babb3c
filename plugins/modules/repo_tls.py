#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: offline.delivery developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: repo_tls
short_description: Make the site CA (once) and the repo host's server certificate signed by it
version_added: 0.2.0
description:
  - The TLS option of a site (inventory variable C(offline_delivery_tls), docs/site-repo.md "TLS"). Run on the
    repo host. Makes a certificate authority on site the first time (ECDSA P-256, C(private/site-ca.key) mode
    0600 in a 0700 directory under O(tls_dir); its private key never leaves the host) and keeps it afterwards.
  - Issues the repo host's server certificate (C(server.crt), C(private/server.key)) for O(names), signed by the
    CA, and issues it again only when its names differ, it is not signed by the CA, or it expires within
    O(renew_days) days.
  - Returns the CA certificate (public), which the controller hands to every client of the site.
  - Needs python3-cryptography on the host (the repo profile of a bundle installs it).
author:
  - offline.delivery developers (@offline-delivery)
notes:
  - Neither private key is ever returned or logged; back up O(tls_dir) as a signing key is backed up. A lost CA
    means a new one, and every client then needs C(offline.delivery.runtime) again.
extends_documentation_fragment:
  - offline.delivery.attributes
attributes:
  check_mode:
    support: full
    details: Reports whether the CA would be made or the certificate issued, writing nothing.
  diff_mode:
    support: none
  idempotent:
    support: full
options:
  tls_dir:
    description: Directory of C(site-ca.crt), C(server.crt) and C(private/).
    type: path
    default: /etc/offline-delivery/tls
  names:
    description: Every host name and IP address the site's hosts reach the repo host at (subject alternative names).
    type: list
    elements: str
    required: true
  common_name:
    description: Subject of a CA made by this run.
    type: str
    default: offline.delivery site CA
  ca_days:
    description: Validity of a CA made by this run, in days.
    type: int
    default: 7300
  cert_days:
    description: Validity of a server certificate issued by this run, in days.
    type: int
    default: 825
  renew_days:
    description: Issue the server certificate again when it expires within this many days.
    type: int
    default: 30
seealso:
  - module: offline.delivery.repo_apt_publish
"""

EXAMPLES = r"""
- name: The site CA and the repo host's certificate
  offline.delivery.repo_tls:
    names: [repo, 10.0.0.2, 127.0.0.1]
  register: site_tls
"""

RETURN = r"""
ca_pem:
  description: The CA certificate, PEM (public; what every client trusts).
  returned: success
  type: str
ca_fingerprint:
  description: C(sha256:<hex>) of the CA certificate's DER bytes.
  returned: success
  type: str
ca_created:
  description: Whether this run made the CA (or would, in check mode).
  returned: success
  type: bool
cert_issued:
  description: Whether this run issued the server certificate (or would, in check mode).
  returned: success
  type: bool
names:
  description: The names in the server certificate (sorted).
  returned: success
  type: list
  elements: str
not_after:
  description: End of the server certificate's validity (ISO 8601, UTC).
  returned: success
  type: str
ca_cert:
  description: Path of the CA certificate.
  returned: success
  type: str
server_cert:
  description: Path of the server certificate.
  returned: success
  type: str
server_key:
  description: Path of the server's private key (0600).
  returned: success
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ..module_utils.site.tls import DEFAULT_TLS_DIR, TlsError, ensure_site_tls


def main() -> None:
    module = AnsibleModule(
        argument_spec={"tls_dir": {"type": "path", "default": DEFAULT_TLS_DIR},
                       "names": {"type": "list", "elements": "str", "required": True},
                       "common_name": {"type": "str", "default": "offline.delivery site CA"},
                       "ca_days": {"type": "int", "default": 7300},
                       "cert_days": {"type": "int", "default": 825},
                       "renew_days": {"type": "int", "default": 30}},
        supports_check_mode=True,
    )
    p = module.params
    try:
        res = ensure_site_tls(p["tls_dir"], p["names"], common_name=p["common_name"], ca_days=p["ca_days"],
                              cert_days=p["cert_days"], renew_days=p["renew_days"], check_mode=module.check_mode)
    except (TlsError, OSError) as exc:
        module.fail_json(msg=f"site TLS ({p['tls_dir']}): {exc}")
    would = "would be " if module.check_mode else ""
    msg = (("site CA " + would + "made; " if res.ca_created else "site CA kept; ")
           + ("server certificate " + would + "issued" if res.cert_issued else "server certificate current")
           + f" for {', '.join(res.names)}; CA {res.ca_fingerprint}")
    module.exit_json(msg=msg, **res.as_dict())


if __name__ == "__main__":
    main()
