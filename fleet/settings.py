"""Control-plane settings, all from the environment (docs/operations.md lists every one).

Defaults make `make demo` work on a laptop: SQLite under var/, Redis and Mosquitto on
localhost, artifacts on local disk, a generated dev signing key. A bad value stops the
process at start with a message that names the variable.
"""

from __future__ import annotations

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()


def _read(name: str, cast, default):
    """Read one variable; on a bad value name it, instead of failing somewhere later."""
    try:
        return cast(name, default=default)
    except (ValueError, TypeError, ImproperlyConfigured) as exc:
        raise ImproperlyConfigured(f"{name}: invalid value ({exc})") from exc


def _secret(name: str, default: str | None = None) -> str | None:
    """A secret from NAME or from the file named by NAME_FILE (docker/systemd secrets)."""
    path = env.str(f"{name}_FILE", default="")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE: cannot read {path}: {exc}") from exc
    return env.str(name, default=default)


def _positive(name: str, value: int | float) -> int | float:
    if value <= 0:
        raise ImproperlyConfigured(f"{name}: must be greater than zero, got {value}")
    return value


DEBUG = _read("DEBUG", env.bool, False)


def _path(name: str, default: Path) -> Path:
    """A path setting; relative values are relative to the project directory."""
    value = Path(_read(name, env.str, str(default)))
    return value if value.is_absolute() else BASE_DIR / value


VAR_DIR = _path("VAR_DIR", BASE_DIR / "var")

SECRET_KEY = _secret("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY: required when DEBUG is off (set SECRET_KEY or SECRET_KEY_FILE, "
            "or DEBUG=1 for a development default)"
        )
    SECRET_KEY = "dev-only-insecure-secret-key-do-not-use-in-production"

ALLOWED_HOSTS = _read("ALLOWED_HOSTS", env.list, ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = _read("CSRF_TRUSTED_ORIGINS", env.list, [])
# JSON under /api/, Django's page elsewhere (docs/api.md, "Errors everywhere under /api/").
CSRF_FAILURE_VIEW = "fleet.core.errors.csrf_failure"

# --- HTTPS (docs/operations.md, "HTTPS"): on by default without DEBUG, so that a production
# start passes `manage.py check --deploy` with no warning. Behind a proxy that terminates
# TLS, name the header it sets (e.g. SECURE_PROXY_SSL_HEADER=X-Forwarded-Proto): only a
# proxy you run may set it, or any client could claim to be on HTTPS.
SECURE_SSL_REDIRECT = _read("SECURE_SSL_REDIRECT", env.bool, not DEBUG)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = _read("SECURE_COOKIES", env.bool, not DEBUG)
SECURE_HSTS_SECONDS = _read("SECURE_HSTS_SECONDS", env.int, 0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _read("SECURE_HSTS_INCLUDE_SUBDOMAINS", env.bool, not DEBUG)
SECURE_HSTS_PRELOAD = _read("SECURE_HSTS_PRELOAD", env.bool, not DEBUG)
_proxy_ssl_header = _read("SECURE_PROXY_SSL_HEADER", env.str, "")
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_" + _proxy_ssl_header.upper().replace("-", "_"), "https") if _proxy_ssl_header else None
)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and Redoc served from our own static files
    "django_celery_beat",
    "fleet.core",
    "fleet.registry",
    "fleet.mqtt",
    "fleet.devices",
    "fleet.rollouts",
]

MIDDLEWARE = [
    "fleet.core.metrics.metrics_middleware",  # first: it times everything below it
    "fleet.core.logs.request_id_middleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files (admin, API docs) from STATIC_ROOT, filled by collectstatic: no web
    # server of their own needed in front of gunicorn (docs/operations.md, "Processes").
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "fleet.urls"
WSGI_APPLICATION = "fleet.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "fleet" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# --- database
_sqlite_default = f"sqlite:///{VAR_DIR / 'modelfleet.sqlite3'}"
_db_scheme = env.str("DATABASE_URL", default=_sqlite_default).split("://", 1)[0]
if _db_scheme not in environ.Env.DB_SCHEMES:
    raise ImproperlyConfigured(
        f"DATABASE_URL: unknown scheme {_db_scheme!r}; use postgres://… (or sqlite:///path for a demo)"
    )
try:
    DATABASES = {"default": env.db_url("DATABASE_URL", default=_sqlite_default)}
except (ValueError, ImproperlyConfigured) as exc:
    raise ImproperlyConfigured(f"DATABASE_URL: invalid value ({exc})") from exc
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL and IMMEDIATE transactions let the web server and a Celery worker share the
    # demo database without "database is locked" errors.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# whitenoise (MIDDLEWARE) reads STATIC_ROOT once at start in production. In development and
# tests (DEBUG=1, even where the test runner turns DEBUG off) it looks at each request,
# so that it needs no collectstatic and warns about no missing directory.
WHITENOISE_AUTOREFRESH = DEBUG

# --- artifact storage (Django storage API; docs/operations.md shows the S3 setup)
ARTIFACT_ROOT = _path("ARTIFACT_ROOT", VAR_DIR / "artifacts")
ARTIFACT_STORAGE = _read("ARTIFACT_STORAGE", env.str, "local")
if ARTIFACT_STORAGE == "local":
    _artifact_backend = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(ARTIFACT_ROOT), "file_permissions_mode": 0o640},
    }
elif ARTIFACT_STORAGE == "s3":
    _artifact_backend = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": _read("ARTIFACT_S3_BUCKET", env.str, None),
            "endpoint_url": _read("ARTIFACT_S3_ENDPOINT_URL", env.str, None),
            "region_name": _read("ARTIFACT_S3_REGION", env.str, None),
            "access_key": _secret("ARTIFACT_S3_ACCESS_KEY"),
            "secret_key": _secret("ARTIFACT_S3_SECRET_KEY"),
            "default_acl": "private",
            "file_overwrite": False,
        },
    }
    if not _artifact_backend["OPTIONS"]["bucket_name"]:
        raise ImproperlyConfigured("ARTIFACT_S3_BUCKET: required when ARTIFACT_STORAGE=s3")
else:
    raise ImproperlyConfigured(f"ARTIFACT_STORAGE: must be 'local' or 's3', got {ARTIFACT_STORAGE!r}")

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "artifacts": _artifact_backend,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
MEDIA_ROOT = VAR_DIR / "media"

# Uploads stream to a temporary file on disk, never into memory (registry issue, 4).
FILE_UPLOAD_HANDLERS = ["fleet.registry.uploads.LimitedTemporaryFileUploadHandler"]
FILE_UPLOAD_TEMP_DIR = _read("FILE_UPLOAD_TEMP_DIR", env.str, None)
ARTIFACT_MAX_UPLOAD_BYTES = _positive(
    "ARTIFACT_MAX_UPLOAD_BYTES", _read("ARTIFACT_MAX_UPLOAD_BYTES", env.int, 512 * 1024 * 1024)
)
GOLDEN_SET_MAX_BYTES = _positive(
    "GOLDEN_SET_MAX_BYTES", _read("GOLDEN_SET_MAX_BYTES", env.int, 16 * 1024 * 1024)
)
# zstd level: high by default, because an artifact is compressed once and downloaded
# by every device of the fleet.
ARTIFACT_ZSTD_LEVEL = _read("ARTIFACT_ZSTD_LEVEL", env.int, 19)
if not 1 <= ARTIFACT_ZSTD_LEVEL <= 22:
    raise ImproperlyConfigured(f"ARTIFACT_ZSTD_LEVEL: must be 1..22, got {ARTIFACT_ZSTD_LEVEL}")
ARTIFACT_ZSTD_THREADS = _read("ARTIFACT_ZSTD_THREADS", env.int, -1)  # -1: one per CPU

# --- signing: the private key never lives in the database
SIGNING_KEY_FILE = _path("SIGNING_KEY_FILE", VAR_DIR / "signing-key.pem")
# Only a development setup may generate its own key; production provisions one.
SIGNING_KEY_AUTOGENERATE = _read("SIGNING_KEY_AUTOGENERATE", env.bool, DEBUG)

# --- model inspection sandbox (docs/security.md, "Model inspection sandbox"): the limits of
# the child process that parses, loads and runs uploaded models.
SANDBOX_MEMORY_BYTES = _positive(
    "SANDBOX_MEMORY_BYTES", _read("SANDBOX_MEMORY_BYTES", env.int, 2 * 1024 * 1024 * 1024)
)
SANDBOX_CPU_SECONDS = _positive("SANDBOX_CPU_SECONDS", _read("SANDBOX_CPU_SECONDS", env.int, 60))
SANDBOX_WALL_SECONDS = _positive(
    "SANDBOX_WALL_SECONDS", _read("SANDBOX_WALL_SECONDS", env.int, 2 * SANDBOX_CPU_SECONDS + 30)
)
SANDBOX_FILE_BYTES = _read("SANDBOX_FILE_BYTES", env.int, 1024 * 1024)
if SANDBOX_FILE_BYTES < 0:
    raise ImproperlyConfigured(f"SANDBOX_FILE_BYTES: must be 0 or more, got {SANDBOX_FILE_BYTES}")
# Off only on a host whose kernel lacks Landlock or namespaces, knowingly (a warning in the docs).
SANDBOX_REQUIRE_ISOLATION = _read("SANDBOX_REQUIRE_ISOLATION", env.bool, True)
GOLDEN_SET_MAX_SAMPLES = _positive("GOLDEN_SET_MAX_SAMPLES", _read("GOLDEN_SET_MAX_SAMPLES", env.int, 10_000))
GOLDEN_SET_MAX_ARRAY_BYTES = _positive(
    "GOLDEN_SET_MAX_ARRAY_BYTES", _read("GOLDEN_SET_MAX_ARRAY_BYTES", env.int, 64 * 1024 * 1024)
)

# --- quantization factory (docs/quantization.md)
# Tensor-level deltas (docs/protocol.md, addition 11): when an artifact is ready, deltas are
# made from the ready artifacts (same variant) of this many earlier released versions of
# the model (0: none), and offered only when smaller than this fraction of the full blob.
DELTA_BASES = _read("DELTA_BASES", env.int, 2)
if not 0 <= DELTA_BASES <= 10:
    raise ImproperlyConfigured(f"DELTA_BASES: must be 0..10, got {DELTA_BASES}")
DELTA_MAX_RATIO = _read("DELTA_MAX_RATIO", env.float, 0.8)
if not 0 < DELTA_MAX_RATIO <= 1:
    raise ImproperlyConfigured(f"DELTA_MAX_RATIO: must be more than 0 and at most 1, got {DELTA_MAX_RATIO}")
# Largest golden-accuracy drop, in percentage points against the float32 parent, a produced
# variant may show before it is rejected (a model's own limit overrides it).
QUANT_MAX_ACCURACY_DROP_PP = _read("QUANT_MAX_ACCURACY_DROP_PP", env.float, 2.0)
if QUANT_MAX_ACCURACY_DROP_PP < 0:
    raise ImproperlyConfigured(
        f"QUANT_MAX_ACCURACY_DROP_PP: must be 0 or more, got {QUANT_MAX_ACCURACY_DROP_PP}"
    )
# Inferences timed (on zeros, in the sandbox) for each artifact's latency median.
LATENCY_RUNS = _positive("LATENCY_RUNS", _read("LATENCY_RUNS", env.int, 20))
# Calibration samples taken from the golden set for full-integer int8.
QUANT_CALIBRATION_SAMPLES = _positive(
    "QUANT_CALIBRATION_SAMPLES", _read("QUANT_CALIBRATION_SAMPLES", env.int, 500)
)

# --- Redis, Celery, MQTT
REDIS_URL = _read("REDIS_URL", env.str, "redis://127.0.0.1:6379/0")
MQTT_URL = _read("MQTT_URL", env.str, "mqtt://127.0.0.1:1883")
for _name, _url, _schemes in (
    ("REDIS_URL", REDIS_URL, ("redis", "rediss", "unix")),
    ("MQTT_URL", MQTT_URL, ("mqtt", "mqtts", "ws", "wss")),
):
    if _url.split("://", 1)[0] not in _schemes or "://" not in _url:
        raise ImproperlyConfigured(f"{_name}: must start with one of {_schemes}, got {_url!r}")

MQTT_TOPIC_PREFIX = _read("MQTT_TOPIC_PREFIX", env.str, "fleet/v1")
# The CA that signed the broker's certificate, for an mqtts:// MQTT_URL behind a private CA
# (docs/security.md, "TLS"); empty: the system's CAs.
MQTT_CA_FILE = _read("MQTT_CA_FILE", env.str, "")
if MQTT_CA_FILE and not Path(MQTT_CA_FILE).is_file():
    raise ImproperlyConfigured(f"MQTT_CA_FILE: {MQTT_CA_FILE} is not a readable file")
# The control plane's service account for publishing desired states (docs/mqtt.md).
MQTT_PUBLISHER_USERNAME = _read("MQTT_PUBLISHER_USERNAME", env.str, "fleet-publisher")
MQTT_PUBLISHER_PASSWORD = _secret("MQTT_PUBLISHER_PASSWORD", default="")
# The ingest bridge's service account and batching (docs/ingest.md).
MQTT_INGEST_USERNAME = _read("MQTT_INGEST_USERNAME", env.str, "fleet-ingest")
MQTT_INGEST_PASSWORD = _secret("MQTT_INGEST_PASSWORD", default="")
# The broker's dynamic-security admin, for per-device credentials (docs/mqtt.md).
MQTT_ADMIN_USERNAME = _read("MQTT_ADMIN_USERNAME", env.str, "fleet-admin")
MQTT_ADMIN_PASSWORD = _secret("MQTT_ADMIN_PASSWORD", default="")
INGEST_BATCH_SIZE = _positive("INGEST_BATCH_SIZE", _read("INGEST_BATCH_SIZE", env.int, 1000))
INGEST_FLUSH_MS = _positive("INGEST_FLUSH_MS", _read("INGEST_FLUSH_MS", env.int, 200))
# Messages larger than this are counted and dropped by the bridge (the broker itself
# refuses packets over max_packet_size, 256 KiB).
INGEST_MAX_PAYLOAD_BYTES = _positive(
    "INGEST_MAX_PAYLOAD_BYTES", _read("INGEST_MAX_PAYLOAD_BYTES", env.int, 64 * 1024)
)
# Invariants of a telemetry window (docs/ingest.md, "Invariants"): its length, and how far
# its ts may be ahead of the server clock or behind it (the agent's offline queue sends
# late windows). Refusals are counted per device.
INGEST_MIN_WINDOW_S = _positive("INGEST_MIN_WINDOW_S", _read("INGEST_MIN_WINDOW_S", env.float, 1.0))
INGEST_MAX_WINDOW_S = _positive("INGEST_MAX_WINDOW_S", _read("INGEST_MAX_WINDOW_S", env.float, 3600.0))
INGEST_MAX_FUTURE_S = _positive("INGEST_MAX_FUTURE_S", _read("INGEST_MAX_FUTURE_S", env.float, 120.0))
INGEST_MAX_AGE_S = _positive("INGEST_MAX_AGE_S", _read("INGEST_MAX_AGE_S", env.float, 24 * 3600.0))
# After each (re)subscription the bridge asks devices to send again the telemetry that
# ended up to this long before the last message it received (docs/protocol.md, addition 7).
INGEST_REPLAY_MARGIN_S = _positive("INGEST_REPLAY_MARGIN_S", _read("INGEST_REPLAY_MARGIN_S", env.float, 60.0))
if INGEST_MIN_WINDOW_S > INGEST_MAX_WINDOW_S:
    raise ImproperlyConfigured("INGEST_MIN_WINDOW_S: must not be greater than INGEST_MAX_WINDOW_S")
# Per-device token bucket (messages of all four kinds): the agent sends a window every 30 s
# plus events and status, the e2e tests' agents a window every 0.5 s; a flood beyond it is
# dropped and counted per device before it is queued.
INGEST_DEVICE_RATE = _positive("INGEST_DEVICE_RATE", _read("INGEST_DEVICE_RATE", env.float, 5.0))
INGEST_DEVICE_BURST = _positive("INGEST_DEVICE_BURST", _read("INGEST_DEVICE_BURST", env.int, 100))
# Bounds of the bridge's memory: the queue between the network thread and the writer
# (beyond it QoS 0 messages are dropped; QoS 1 ones are bounded by the Receive Maximum,
# which is at most INGEST_MAX_PENDING), and the per-device buckets and counters it keeps.
INGEST_MAX_PENDING = _positive("INGEST_MAX_PENDING", _read("INGEST_MAX_PENDING", env.int, 50_000))
INGEST_MAX_PENDING_BYTES = _positive(
    "INGEST_MAX_PENDING_BYTES", _read("INGEST_MAX_PENDING_BYTES", env.int, 64 * 1024 * 1024)
)
INGEST_MAX_TRACKED_DEVICES = _positive(
    "INGEST_MAX_TRACKED_DEVICES", _read("INGEST_MAX_TRACKED_DEVICES", env.int, 100_000)
)
# Telemetry windows live in daily partitions dropped whole past this age (by window start);
# the per-device hourly sums are kept longer. Events go by their receive time.
TELEMETRY_RETENTION_DAYS = _positive(
    "TELEMETRY_RETENTION_DAYS", _read("TELEMETRY_RETENTION_DAYS", env.int, 7)
)
TELEMETRY_HOURLY_RETENTION_DAYS = _positive(
    "TELEMETRY_HOURLY_RETENTION_DAYS", _read("TELEMETRY_HOURLY_RETENTION_DAYS", env.int, 90)
)
# The gates are evaluated every 5 s and each keeps a row per gate (about 100,000 rows a
# day for a running rollout): past this age, a beat task keeps of each rollout only the
# evaluations that acted, the last of each stage and the first of each hour (the charts'
# points), so a rollout's history stays readable and bounded (docs/scaling.md).
GATE_EVALUATION_RETENTION_DAYS = _positive(
    "GATE_EVALUATION_RETENTION_DAYS", _read("GATE_EVALUATION_RETENTION_DAYS", env.int, 7)
)
# A device silent for longer than this is marked offline by a beat task.
DEVICE_STALE_SECONDS = _positive("DEVICE_STALE_SECONDS", _read("DEVICE_STALE_SECONDS", env.int, 300))

# Base URL devices use to reach this control plane (manifest/blob URLs in desired states).
PUBLIC_BASE_URL = _read("PUBLIC_BASE_URL", env.str, "http://127.0.0.1:8000").rstrip("/")
if not PUBLIC_BASE_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(
        f"PUBLIC_BASE_URL: must start with http:// or https://, got {PUBLIC_BASE_URL!r}"
    )
# How many signed desired states one Celery publishing task carries.
DESIRED_PUBLISH_CHUNK = _positive("DESIRED_PUBLISH_CHUNK", _read("DESIRED_PUBLISH_CHUNK", env.int, 500))
# A rollout's device that has said nothing about its desired state this long after it
# was notified gets it again (a crash may have lost it before the broker; docs/operations.md).
DESIRED_REPUBLISH_SECONDS = _positive(
    "DESIRED_REPUBLISH_SECONDS", _read("DESIRED_REPUBLISH_SECONDS", env.int, 60)
)
# A desired state older than this is refused by devices (a replayed old command).
DESIRED_STATE_TTL_SECONDS = _positive(
    "DESIRED_STATE_TTL_SECONDS", _read("DESIRED_STATE_TTL_SECONDS", env.int, 7 * 24 * 3600)
)

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_DEFAULT_QUEUE = _read("CELERY_QUEUE", env.str, "fleet")
CELERY_TASK_ACKS_LATE = True  # a worker killed mid-task leaves the task for another
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = _positive(
    "CELERY_TASK_SOFT_TIME_LIMIT", _read("CELERY_TASK_SOFT_TIME_LIMIT", env.int, 600)
)
CELERY_TASK_TIME_LIMIT = _read("CELERY_TASK_TIME_LIMIT", env.int, CELERY_TASK_SOFT_TIME_LIMIT + 60)
if CELERY_TASK_TIME_LIMIT <= CELERY_TASK_SOFT_TIME_LIMIT:
    raise ImproperlyConfigured("CELERY_TASK_TIME_LIMIT: must be above CELERY_TASK_SOFT_TIME_LIMIT")
CELERY_TASK_ALWAYS_EAGER = _read("CELERY_TASK_ALWAYS_EAGER", env.bool, False)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"

# --- API
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "fleet.core.auth.ApiTokenAuthentication",
        "fleet.devices.auth.DeviceTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["fleet.core.permissions.IsViewer"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "fleet.core.listing.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_SCHEMA_CLASS": "fleet.core.schema.AutoSchema",
    "EXCEPTION_HANDLER": "fleet.core.errors.api_exception_handler",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Modelfleet control plane API",
    "DESCRIPTION": "Model registry, devices and rollouts. See docs/api.md.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # No CDN: an ops network may be offline (issue 10, section 3).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {"QuantRecipeEnum": "fleet.registry.choices.QuantRecipe"},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "fleet.core.schema.ordering_enum_names",
    ],
}
# How long an upload may wait for its pipeline to finish when the client asks to (?wait=).
ARTIFACT_UPLOAD_MAX_WAIT_SECONDS = _read("ARTIFACT_UPLOAD_MAX_WAIT_SECONDS", env.int, 300)

# Enrollment attempts per client IP (docs/enrollment.md).
ENROLL_RATE = _read("ENROLL_RATE", env.str, "30/minute")

# --- enrollment hardening (issue 9, section 1; docs/enrollment.md)
# How many reverse proxies in front of the control plane append the address they saw to
# X-Forwarded-For. With 0 the enrollment throttle keys on the peer address alone: the
# header is written by the client and would let it pick a new address for every try.
TRUSTED_PROXY_COUNT = _read("TRUSTED_PROXY_COUNT", env.int, 0)
if TRUSTED_PROXY_COUNT < 0:
    raise ImproperlyConfigured(f"TRUSTED_PROXY_COUNT: must be 0 or more, got {TRUSTED_PROXY_COUNT}")
# DRF's own throttles read the client address the same way.
REST_FRAMEWORK["NUM_PROXIES"] = TRUSTED_PROXY_COUNT
# Enrollment tokens created without an expiry or a use limit get these: a token baked into
# an image leaks sooner or later, and must then stop working on its own.
ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS = _positive(
    "ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS", _read("ENROLLMENT_TOKEN_DEFAULT_TTL_DAYS", env.float, 30.0)
)
ENROLLMENT_TOKEN_DEFAULT_MAX_USES = _positive(
    "ENROLLMENT_TOKEN_DEFAULT_MAX_USES", _read("ENROLLMENT_TOKEN_DEFAULT_MAX_USES", env.int, 100)
)

# Bulk provisioning (docs/enrollment.md): devices per request, each with its credentials in
# the answer; a factory sends several requests for a larger batch.
DEVICE_PROVISION_MAX_DEVICES = _positive(
    "DEVICE_PROVISION_MAX_DEVICES", _read("DEVICE_PROVISION_MAX_DEVICES", env.int, 1000)
)

MQTT_PUBLIC_URL = _read("MQTT_PUBLIC_URL", env.str, MQTT_URL)  # the broker as devices reach it
# Rate limits live in this cache. Its own URL, so that tests can empty it without
# touching Celery's queues.
CACHE_URL = _read("CACHE_URL", env.str, REDIS_URL)
CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}}

# --- metrics and logs (docs/operations.md, "Metrics and logs")
# GET /metrics answers only "Authorization: Bearer <METRICS_TOKEN>"; unset, it is off.
METRICS_TOKEN = _secret("METRICS_TOKEN", default="")
# The ingest bridge serves its own metrics (it is its own process); 0: off.
INGEST_METRICS_PORT = _read("INGEST_METRICS_PORT", env.int, 0)
INGEST_METRICS_ADDR = _read("INGEST_METRICS_ADDR", env.str, "127.0.0.1")
# A worker host without a web process may serve its workers' metrics itself; 0: off.
WORKER_METRICS_PORT = _read("WORKER_METRICS_PORT", env.int, 0)
WORKER_METRICS_ADDR = _read("WORKER_METRICS_ADDR", env.str, "127.0.0.1")
for _name, _port in (
    ("INGEST_METRICS_PORT", INGEST_METRICS_PORT),
    ("WORKER_METRICS_PORT", WORKER_METRICS_PORT),
):
    if not 0 <= _port <= 65535:
        raise ImproperlyConfigured(f"{_name}: must be a port number (0 for off), got {_port}")

# "plain" (one line of text) or "json" (one JSON object a line, with request_id, device_id
# and rollout_id where they apply) for every process: web, worker, beat, ingest.
LOG_FORMAT = _read("LOG_FORMAT", env.str, "plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT: must be 'plain' or 'json', got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "fleet.core.logs.ContextFilter"}},
    # Only the format in use: dictConfig builds every formatter it is given.
    "formatters": {
        LOG_FORMAT: {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
        if LOG_FORMAT == "plain"
        else {"()": "agent.metrics.json_formatter"}
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]}
    },
    "root": {"handlers": ["console"], "level": _read("LOG_LEVEL", env.str, "INFO")},
}
# Celery workers and beat log through the LOGGING above too, not a format of Celery's own.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
