"""Native mutual TLS on gRPC in the chart (issue 18, finding 7; ctloop/grpc_tls.py): one pair
per party from one CA, each pod mounting only its own, in the file names the code reads."""

from __future__ import annotations

import base64
import ipaddress

from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.helm.conftest import Doc, named, of_kind, render

SERVICES = ("ingest", "inference", "training", "metrics")
PARTIES = (*SERVICES, "operator", "release-check")


def _tls_volume(spec: Doc) -> Doc | None:
    found = [v for v in spec.get("volumes", []) if v["name"] == "grpc-tls"]
    return found[0] if found else None


def _pod_specs(docs: list[Doc]) -> dict[str, Doc]:
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out[d["metadata"]["name"]] = d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            out[d["metadata"]["name"]] = d["spec"]
    return out


def test_each_service_and_the_release_check_mount_only_their_own_pair():
    docs = render()
    for name, spec in _pod_specs(docs).items():
        party = name.removeprefix("ctloop-")
        volume = _tls_volume(spec)
        if party not in PARTIES:  # Triton, Kafka, the stores, the S3 Job: no gRPC of ours
            assert volume is None, name
            continue
        assert volume is not None, name
        assert volume["secret"]["secretName"] == f"ctloop-grpc-tls-{party}"
        files = {i["key"]: i["path"] for i in volume["secret"]["items"]}
        assert files == {"ca.crt": "ca.crt", "tls.crt": f"{party}.crt", "tls.key": f"{party}.key"}
        assert volume["secret"]["defaultMode"] == 0o440
        (main,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in main["env"]}
        mount = next(m for m in main["volumeMounts"] if m["name"] == "grpc-tls")
        assert env["CTLOOP_GRPC__TLS_DIR"] == mount["mountPath"] and mount["readOnly"]
    # the operator's pair is in no pod
    assert "grpc-tls-operator" not in str(list(_pod_specs(docs).values()))


def test_the_pairs_share_one_ca_and_name_their_party_and_its_service():
    docs = render()
    secrets = {
        d["metadata"]["name"]: d
        for d in of_kind(docs, "Secret")
        if d["metadata"]["name"].startswith("ctloop-grpc-tls-")
    }
    assert set(secrets) == {f"ctloop-grpc-tls-{p}" for p in PARTIES}
    cas = set()
    for party in PARTIES:
        secret = secrets[f"ctloop-grpc-tls-{party}"]
        assert secret["type"] == "kubernetes.io/tls"
        data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        cas.add(data["ca.crt"])
        ca = x509.load_pem_x509_certificate(data["ca.crt"])
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        cert.verify_directly_issued_by(ca)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert cn == party  # the server binds a call's caller to this name
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = set(alt.get_values_for_type(x509.DNSName))
        assert {f"ctloop-{party}", f"ctloop-{party}.ctloop.svc", "localhost"} <= dns
        assert ipaddress.ip_address("127.0.0.1") in alt.get_values_for_type(x509.IPAddress)
        assert b"PRIVATE KEY" in data["tls.key"]
    assert len(cas) == 1


def test_services_dial_each_other_at_names_their_certificates_carry():
    """A client checks the server's certificate against the name it dials: each service's
    address in the settings is a DNS name in that service's certificate."""
    from tests.helm.test_settings_and_secrets import service_container, settings_of

    docs = render()
    s = settings_of(service_container(docs, "ingest"))
    for svc in ("inference", "training", "metrics"):
        host = s.services.grpc_target(svc).rsplit(":", 1)[0]  # type: ignore[arg-type]
        data = named(docs, "Secret", f"grpc-tls-{svc}")["data"]
        cert = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert host in alt.get_values_for_type(x509.DNSName), (svc, host)


def test_given_secrets_are_mounted_and_none_generated_for_them():
    docs = render(set_values=("grpcTls.existingSecrets.ingest=cm-ingest",))
    names = {d["metadata"]["name"] for d in of_kind(docs, "Secret")}
    assert "ctloop-grpc-tls-ingest" not in names and "ctloop-grpc-tls-training" in names
    spec = named(docs, "Deployment", "ingest")["spec"]["template"]["spec"]
    assert _tls_volume(spec)["secret"]["secretName"] == "cm-ingest"  # type: ignore[index]


def test_tls_off_is_plain_text_with_tokens():
    docs = render(set_values=("grpcTls.enabled=false",))
    assert "grpc-tls" not in str(docs)
    spec = named(docs, "Deployment", "ingest")["spec"]["template"]["spec"]
    env = {e["name"] for e in spec["containers"][0]["env"]}
    assert "CTLOOP_GRPC__TLS_DIR" not in env and "CTLOOP_GRPC__TOKEN" in env
