"""One typed settings object for every ctloop process.

Values come from the environment (prefix ``CTLOOP_``, nested groups joined by ``__``, e.g.
``CTLOOP_KAFKA__PORT=29092``) or a ``.env`` file; defaults describe the embedded local stack.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class KafkaSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 19092
    controller_port: int = 19093
    # Set to use an existing cluster instead of the embedded broker ("host:port,host:port").
    external_bootstrap: str | None = None
    topic_partitions: int = 3
    # Replicas of each ctloop topic: 1 for one broker; 3 with the chart's 3-broker example,
    # whose min.insync.replicas=2 refuses acks=all writes to a topic with fewer replicas.
    topic_replication_factor: int = Field(default=1, ge=1)
    # How long the brokers keep ctloop's events; -1: for ever. The metrics service restarts
    # from its snapshot (see MetricsSettings), so a finite retention keeps its rounds as long as
    # a snapshot covered the events before they expired.
    topic_retention_ms: int = Field(default=-1, ge=-1)
    heap: str = "512m"
    # Prepended to every consumer group: two platform instances on one cluster (e.g. a
    # `ctloop run` beside `make services-up`) then never share a group.
    group_prefix: str = ""
    # SASL/SCRAM-SHA-512 (see ctloop/kafka_security.py): the principal this process is (its
    # grants are in ctloop/contracts/kafka_acls.py) and its password. The chart sets both from
    # the service's own Secret. Without a password the client reads it from the credentials
    # file the local stack's broker writes (<run_dir>/kafka-credentials.json, else
    # ``credentials_file``: a platform instance's run folder has none of its own); no file
    # either: PLAINTEXT, as a broker without SASL expects. No principal: the service whose
    # module runs this process (``python -m services.<name>``), else ``admin`` (the stack, the
    # operator's tools, the tests).
    principal: str | None = None
    password: SecretStr | None = None
    credentials_file: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return self.external_bootstrap or f"{self.host}:{self.port}"


class S3Settings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 17070
    external_endpoint: str | None = None  # "host:port" of MinIO / another S3 service
    secure: bool = False
    access_key: str = "ctloop"
    secret_key: SecretStr = SecretStr("ctloop-local-secret")
    region: str = "us-east-1"
    bucket: str = "ctloop"
    model_bucket: str = "ctloop-models"
    # The S3 identity this process uses (ctloop/s3_grants.py: ingest, inference, training,
    # metrics, triton), each limited to what it needs. Unset: the service whose module runs
    # this process (``python -m services.<name>``), else none: the root credential above (the
    # stack itself, admin tools). The chart sets it, and the identity's own keys as
    # access_key/secret_key.
    identity: str | None = None
    # Where the local stack's gateway wrote each identity's credential (<identity>.json, 0600);
    # default <run_dir>/s3-credentials. No file for the identity: access_key/secret_key.
    credentials_dir: Path | None = None

    @property
    def endpoint(self) -> str:
        return self.external_endpoint or f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.endpoint}"


class TritonSettings(BaseModel):
    host: str = "127.0.0.1"
    http_port: int = 18000
    grpc_port: int = 18001
    metrics_port: int = 18002
    external_url: str | None = None  # "host:port" of an existing Triton gRPC endpoint
    model_prefix: str = "models"  # folder of the model repository inside the model bucket
    startup_timeout_s: float = 120.0
    # Where the served models run: "gpu" when the Triton replicas have GPUs (the chart says so
    # when it gives Triton nvidia.com/gpu), "cpu" otherwise; instances per GPU (or in all).
    instance_kind: Literal["cpu", "gpu"] = "cpu"
    instance_count: int = Field(default=1, ge=1)
    # What runs the network on CPU instances: ONNX Runtime (each version's model.onnx, exported
    # at publish; 0.63x torch's time on the realistic network, same masks to Dice 0.9996) or
    # torch. GPU instances run torch.
    cpu_runtime: Literal["onnxruntime", "torch"] = "onnxruntime"
    # On CPU replicas, the long-lived model that runs the sliding window and the resampling
    # back for every version (each version loads as its network alone, in a fraction of a
    # second: no torch or MONAI to import). Published by whoever publishes versions.
    pipeline_model: str = "ctloop-pipeline"
    # Every replica, when several serve behind one address: explicit model control is per
    # server, so the inference service loads on each (inference requests still go to
    # grpc_url). "host:port" entries, comma-separated; each host resolves to all its addresses
    # (a Kubernetes headless Service: one per ready pod), a missing port is grpc_port. Unset:
    # grpc_url is the only replica.
    replicas: str | None = None
    # How often the inference service loads the serving version on replicas that lack it (a
    # new or restarted one comes up with nothing loaded).
    reconcile_interval_s: float = Field(default=10.0, gt=0)

    @property
    def grpc_url(self) -> str:
        return self.external_url or f"{self.host}:{self.grpc_port}"


class DatabaseSettings(BaseModel):
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    # Full SQLAlchemy URL of an existing database; overrides the embedded one.
    url: str | None = None
    pg_host: str = "127.0.0.1"
    pg_port: int = 55432
    pg_user: str = "ctloop"
    pg_password: SecretStr = SecretStr("ctloop-local-secret")
    pg_database: str = "ctloop"


class Endpoint(BaseModel):
    http_port: int
    grpc_port: int
    # Where the other services reach this one (e.g. its Kubernetes Service name); by default
    # ``services.host``, which is also the address every service binds to.
    address: str | None = None


class ServicesSettings(BaseModel):
    """Where each ctloop service listens (HTTP: API or health/metrics; gRPC: internal API)."""

    host: str = "127.0.0.1"
    ingest: Endpoint = Endpoint(http_port=8000, grpc_port=50051)
    inference: Endpoint = Endpoint(http_port=18100, grpc_port=50052)
    training: Endpoint = Endpoint(http_port=18200, grpc_port=50053)
    metrics: Endpoint = Endpoint(http_port=18300, grpc_port=50054)
    max_upload_mb: int = 1024  # one upload (volume, DICOM zip or mask), compressed
    max_volume_voxels: int = 1024 * 1024 * 1024  # decompressed size guard
    shutdown_grace_s: float = 20.0
    lease_s: float = 30 * 60  # how long a claimed task stays with its annotator unless renewed
    queue_strategy: Literal["uncertainty", "random", "sequential"] = "uncertainty"
    # DICOMweb services (PACS base URLs) each site's volumes may be pulled from, beside those
    # admins add (/v1/sites/{site}/dicomweb-sources): {"site-a": ["https://pacs-a/dicom-web"]}.
    # Key "*": every site. The old list form is still read, as "*" (deprecated: a PACS serves
    # its own sites). Nothing else is ever fetched.
    dicomweb_sources: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("dicomweb_sources", mode="before")
    @classmethod
    def _sources_by_site(cls, value: Any) -> dict[str, list[str]]:
        from ctloop.dicomweb import sources_by_site

        return sources_by_site(value)

    # MONAI Label sessions (an image a Slicer user segments without adding it to the loop):
    # removed, image and masks, this long after their last use unless the client asks for
    # less; at most this many live per user.
    session_expiry_s: int = 3600
    session_max_expiry_s: int = 24 * 3600
    sessions_per_user: int = 10
    session_sweep_s: float = 30.0  # how often expired sessions are looked for
    # With review on, only revisions a reviewer approved are used for training.
    review_required: bool = False
    # Model names the inference service serves; the sustainer wins once it exists.
    igniter_model: str = "igniter"
    sustainer_model: str = "sustainer"

    def grpc_target(self, name: Literal["ingest", "inference", "training", "metrics"]) -> str:
        """``host:port`` of a service's gRPC API, as another service dials it."""
        ep: Endpoint = getattr(self, name)
        return f"{ep.address or self.host}:{ep.grpc_port}"


class AuthSettings(BaseModel):
    """OIDC bearer tokens (Keycloak-compatible) beside the static API tokens; off unless an
    issuer is set."""

    oidc_issuer: str | None = None  # e.g. https://keycloak.example/realms/ctloop
    oidc_audience: str = "ctloop"
    oidc_jwks_url: str | None = None  # default: Keycloak's <issuer>/protocol/openid-connect/certs
    # The web workbench's sign-in: a public client of the issuer (authorization code + PKCE,
    # redirect URI ``<ingest>/ui/``). Unset: the page only takes pasted tokens.
    oidc_client_id: str | None = None
    oidc_scope: str = "openid"
    # The name shown to people (users.display_name); the identity is always ``sub``, which the
    # issuer never changes (a renamed user keeps their id, rows and tokens).
    username_claim: str = "preferred_username"
    # Dotted path into the token's claims holding the role names. Empty: the roles of the
    # ctloop client itself (``resource_access.<oidc_audience>.roles``), so a realm-wide role
    # such as Keycloak's ``admin`` means nothing here; "realm_access.roles" opts into realm roles.
    roles_claim: str = ""
    sites_claim: str = "ctloop_sites"
    # The issuer's signing keys (JWKS) are fetched again after this many seconds, so a key the
    # issuer removed stops working within it; a token signed with a key not seen yet fetches
    # them at once, but at most once per jwks_refresh_cooldown_s (forged ``kid``s cannot make
    # ingest hammer the issuer).
    jwks_ttl_s: float = Field(default=300.0, gt=0)
    jwks_refresh_cooldown_s: float = Field(default=30.0, ge=0)
    # Lifetime of a new API token when the admin gives none (``--expires-in``), the bootstrap
    # admin's token included: a credential in a file or Secret does not open the API forever.
    token_lifetime_days: int = Field(default=90, ge=1, le=3650)
    # The first admin's API token when the deployment provides it (the chart keeps it in a
    # Secret that outlives pods and upgrades); unset: ingest makes one and writes it to
    # <run_dir>/admin-token. Must start with "ctl_".
    bootstrap_admin_token: SecretStr | None = None
    # Refused requests (401, 403) written to the audit log per client address and minute;
    # past it one summary row, the rest counted (services/ingest/auth_audit.py).
    refusals_audited_per_minute: int = Field(default=10, ge=1)

    @property
    def roles_path(self) -> tuple[str, ...]:
        """Where the role names are in a token's claims (see ``roles_claim``)."""
        if self.roles_claim:
            return tuple(self.roles_claim.split("."))
        return ("resource_access", self.oidc_audience, "roles")

    @property
    def jwks_url(self) -> str | None:
        if self.oidc_jwks_url:
            return self.oidc_jwks_url
        if self.oidc_issuer:
            return self.oidc_issuer.rstrip("/") + "/protocol/openid-connect/certs"
        return None


class GrpcAuthSettings(BaseModel):
    """How a service proves who it is on gRPC, and whom it lets in (ctloop/rpc_auth.py)."""

    # This service's own token for its calls to other services (the chart sets it from the
    # release's gRPC-token Secret). Unset: its entry in <run_dir>/grpc-tokens.json.
    token: SecretStr | None = None
    # Caller name -> hex SHA-256 of that caller's token: whom this service's gRPC server
    # accepts. Empty: every caller in <run_dir>/grpc-tokens.json (made if it is missing).
    callers: dict[str, str] = Field(default_factory=dict)
    # Mutual TLS on every gRPC port and call (ctloop/grpc_tls.py): a folder with ca.crt and
    # this party's <name>.crt/<name>.key (the chart mounts each pod's own; `python -m
    # ctloop.grpc_tls DIR` makes one locally). Unset: plain text (tokens are checked either way).
    tls_dir: Path | None = None


class SecretEnv(BaseModel):
    """An environment variable a training Job pod reads from a Kubernetes Secret."""

    name: str  # e.g. CTLOOP_S3__SECRET_KEY
    secret: str
    key: str


class KubernetesLauncherSettings(BaseModel):
    """How a round runs as a Kubernetes Job (``training.launcher = "kubernetes"``); see
    services/training/kubernetes.py and manifests.py. The Helm chart sets every field."""

    api_url: str = "https://kubernetes.default.svc"
    namespace: str | None = None  # default: the training service's own namespace
    kind: Literal["job", "pytorchjob"] = "job"  # pytorchjob needs the Kubeflow training operator
    image: str = ""  # the ctloop (CUDA) image the Job runs
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    service_account: str = "default"  # of the Job pods (they need no API rights)
    nodes: int = 1  # pods; training.nproc_per_node processes (GPUs) in each
    gpu_resource: str = "nvidia.com/gpu"  # "" trains on CPU (gloo)
    cpu: str = "4"
    memory: str = "32Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = None
    shm_size: str = "8Gi"  # /dev/shm for DataLoader workers and NCCL
    scratch_size: str = "100Gi"  # the round's data inside the pod
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    priority_class: str | None = None
    headless_service: str = ""  # subdomain of the pods; multi-node rendezvous by pod hostname
    # The Deployment (the training service's own, in the chart) that owns every round Job: a
    # Job a restarted service no longer watches, or one running at `helm uninstall`, is then
    # deleted with the release by Kubernetes' garbage collector. Empty: no owner.
    owner_deployment: str = ""
    rdzv_port: int = 29500
    labels: dict[str, str] = Field(default_factory=dict)
    secret_env: list[SecretEnv] = Field(default_factory=list)  # S3 credentials for the pods
    s3_prefix: str = "training/jobs"  # the rounds' inputs and outputs, in the data bucket
    timeout_s: float = 6 * 3600.0
    poll_s: float = 10.0
    ttl_after_finished_s: int = 3600  # clean-up if the service cannot delete the Job itself


class TrainingSettings(BaseModel):
    """The round policy and how rounds train (see services/training)."""

    igniter_min_volumes: int = 4  # labelled public volumes before the igniter trains
    round_min_new: int = 5  # newly corrected clinical volumes that start a sustainer round
    debounce_s: float = 30.0  # quiet time after the last upload/annotation before a round
    holdout_every: int = 5  # every n-th volume is held out to validate the candidate
    public_replay: int = 4  # public volumes mixed into each sustainer round
    nproc_per_node: int = 1  # torchrun processes (GPUs per node in a cluster)
    # One process per round on the local launcher: keep the next round's python started,
    # torch and MONAI imported (~5 s of every round; ~0.85 GB resident while it waits).
    standby_process: bool = True
    igniter_steps: int = 300
    sustainer_steps: int = 200
    from_scratch: bool = False  # retrain each sustainer from scratch instead of fine-tuning
    accept_tolerance: float = 0.0  # publish if candidate Dice >= serving Dice - tolerance
    max_attempts: int = 2
    tick_s: float = 2.0
    model: dict[str, Any] = Field(default_factory=dict)  # ModelConfig overrides (spacing, ...)
    # Where rounds run: torchrun here ("local") or a Kubernetes Job ("kubernetes").
    launcher: Literal["local", "kubernetes"] = "local"
    kubernetes: KubernetesLauncherSettings = KubernetesLauncherSettings()


class MetricsSettings(BaseModel):
    """How the metrics service keeps its state through restarts and Kafka's retention: a
    snapshot in S3 (``metrics/<snapshot_name>/snapshot.json``) with the offsets it covers; a
    restart loads it and reads the topics from there on."""

    # A snapshot is written once this many events came since the last one, or this many
    # seconds passed with some; and at a graceful shutdown.
    snapshot_every_events: int = Field(default=1000, ge=1)
    snapshot_every_s: float = Field(default=60.0, gt=0)
    # One name per Kafka cluster whose events the snapshot holds. Instances reading the same
    # cluster may share it (any of their snapshots is a consistent state with its offsets).
    snapshot_name: str = "default"


class Settings(BaseSettings):
    """Everything configurable, in one place."""

    model_config = SettingsConfigDict(
        env_prefix="CTLOOP_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        # CTLOOP_SERVICES__INGEST__HTTP_PORT alone changes that port and keeps the rest.
        nested_model_default_partial_update=True,
    )

    run_dir: Path = Field(default=REPO_ROOT / ".ctloop")
    # Where the metrics service writes transfer-run reports (runs/<run-id>/, runs/latest).
    runs_dir: Path = Field(default=REPO_ROOT / "runs")
    # Installed by `make setup` (Kafka jars, versitygw, helm); shared by every run directory.
    tools_dir: Path = Field(default=REPO_ROOT / ".ctloop" / "tools")
    log_level: str = "INFO"
    kafka: KafkaSettings = KafkaSettings()
    s3: S3Settings = S3Settings()
    triton: TritonSettings = TritonSettings()
    db: DatabaseSettings = DatabaseSettings()
    services: ServicesSettings = ServicesSettings()
    training: TrainingSettings = TrainingSettings()
    metrics: MetricsSettings = MetricsSettings()
    auth: AuthSettings = AuthSettings()
    grpc: GrpcAuthSettings = GrpcAuthSettings()

    @property
    def admin_token_file(self) -> Path:
        return self.run_dir / "admin-token"

    @property
    def s3_identity(self) -> str | None:
        """:attr:`S3Settings.identity`, or the service this process runs, or None (root)."""
        if self.s3.identity:
            return self.s3.identity
        from ctloop.s3_grants import GRANTS

        return running_service(GRANTS)

    def s3_credential(self, identity: str | None = None) -> tuple[str, str]:
        """(access key, secret key) of ``identity`` (default: this process's): its credential
        file if the local stack wrote one, else the configured keys."""
        from ctloop.s3_grants import credential_file, read_credential

        identity = identity or self.s3_identity
        if identity is not None:
            where = self.s3.credentials_dir or self.run_dir / "s3-credentials"
            found = read_credential(credential_file(where, identity))
            if found is not None:
                return found.access_key, found.secret_key
        return self.s3.access_key, self.s3.secret_key.get_secret_value()

    @property
    def kafka_credentials_file(self) -> Path:
        """Where the local stack's broker writes its principals' passwords (mode 0600)."""
        return self.run_dir / "kafka-credentials.json"

    @property
    def grpc_tokens_file(self) -> Path:
        """Every gRPC caller's token on a local platform (0600; see ctloop/rpc_auth.py)."""
        return self.run_dir / "grpc-tokens.json"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def database_url(self) -> str:
        if self.db.url:
            return self.db.url
        if self.db.backend == "postgresql":
            d = self.db
            password = d.pg_password.get_secret_value()
            return (
                f"postgresql+psycopg://{d.pg_user}:{password}@{d.pg_host}:{d.pg_port}/"
                f"{d.pg_database}"
            )
        return f"sqlite:///{self.data_dir / 'sqlite' / 'ctloop.db'}"


def running_service(known: Collection[str]) -> str | None:
    """The service this process runs (``python -m services.<name>``, also a training round's
    ``services.training.job``) if it is one of ``known``, else None: a service's S3 identity and
    Kafka principal default to its own name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    parts = (getattr(spec, "name", None) or "").split(".")
    if len(parts) >= 2 and parts[0] == "services" and parts[1] in known:
        return parts[1]
    return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
