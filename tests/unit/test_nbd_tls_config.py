"""cowd.frontends.nbd.tls.TlsConfig: the one immutable object the NBD server's TLS is
configured by.  Which flag combinations are refused (one line, a usage error: exit 2), and
that it survives a trip through pickle unchanged, as a worker process would receive it.  No
GnuTLS and no files here: loading the credentials is tests/integration/test_nbd_tls.py's."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from cowd.errors import UsageError
from cowd.frontends.nbd.tls import TlsConfig
from cowd.frontends.nbd.wire import TlsPolicy

AUTHZ = frozenset({("vm1.qcow2", "C=GB,O=Example,CN=laptop"), ("vm2.qcow2", "laptop")})


@pytest.mark.parametrize("kw, needle", [
    ({"policy": TlsPolicy("on")}, "exactly one of"),
    ({"policy": TlsPolicy("require"), "certificates_dir": "/c", "psk_file": "/k"},
     "exactly one of"),
    ({"certificates_dir": "/c"}, "need --tls=on"),
    ({"psk_file": "/k"}, "need --tls=on"),
    ({"verify_peer": True}, "need --tls=on"),
    ({"policy": TlsPolicy("require"), "psk_file": "/k", "verify_peer": True},
     "only with --tls-certificates"),
    ({"policy": TlsPolicy("require", AUTHZ), "certificates_dir": "/c"},
     "needs --tls-verify-peer"),
])
def test_flags_that_do_not_fit_are_usage_errors(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(UsageError, match=needle) as e:
        TlsConfig(**kw)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cfg", [
    TlsConfig(),
    TlsConfig(TlsPolicy("require"), psk_file="/etc/cowd/keys.psk"),
    TlsConfig(TlsPolicy("on", AUTHZ), certificates_dir="/etc/cowd/tls", verify_peer=True),
])
def test_config_is_immutable_and_pickles(cfg: TlsConfig) -> None:
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert pickle.loads(pickle.dumps(cfg.policy)) == cfg.policy
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.verify_peer = True  # type: ignore[misc]
    assert cfg.enabled == (cfg.policy.mode != "off")
