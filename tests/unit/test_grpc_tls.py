"""The gRPC TLS folder (ctloop/grpc_tls.py): what ``python -m ctloop.grpc_tls`` writes, and
how a party finds its pair."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from ctloop.grpc_tls import NAMES, TlsConfigError, load, main
from ctloop.settings import Settings


def test_every_party_gets_a_pair_named_for_it_signed_by_the_ca(tmp_path: Path, capsys):
    assert main([str(tmp_path), "--host", "ctloop-training", "--host", "10.0.0.7"]) == 0
    assert "CTLOOP_GRPC__TLS_DIR" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    assert not (tmp_path / "ca.key").exists()  # the CA's key is not kept
    for name in NAMES:
        cert = x509.load_pem_x509_certificate((tmp_path / f"{name}.crt").read_bytes())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == name and cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(alt.get_values_for_type(x509.DNSName)) == {name, "ctloop-training"}
        assert alt.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
        assert stat.S_IMODE((tmp_path / f"{name}.key").stat().st_mode) == 0o600


def test_no_folder_is_plain_text_and_a_folder_without_the_pair_is_an_error(tmp_path: Path):
    assert load(Settings(), "ingest") is None
    settings = Settings(grpc={"tls_dir": tmp_path})  # type: ignore[arg-type]
    with pytest.raises(TlsConfigError, match=r"ingest\.crt"):
        load(settings, "ingest")
    main([str(tmp_path)])
    pair = load(settings, "ingest")
    assert pair is not None and pair.name == "ingest" and b"PRIVATE KEY" in pair.key
