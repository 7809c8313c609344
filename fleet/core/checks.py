"""`manage.py check --deploy` checks of our own (docs/security.md, "TLS")."""

from django.conf import settings
from django.core.checks import CheckMessage, Tags, register
from django.core.checks import Warning as CheckWarning


@register(Tags.security, deploy=True)
def devices_use_tls(app_configs, **kwargs) -> list[CheckMessage]:
    """What devices are told to dial must be TLS: their broker password, desired states,
    telemetry and bearer token would otherwise cross the network in the clear."""
    problems = []
    if not settings.MQTT_PUBLIC_URL.startswith(("mqtts://", "wss://")):
        problems.append(
            CheckWarning(
                f"MQTT_PUBLIC_URL ({settings.MQTT_PUBLIC_URL}) is not TLS: devices would send their "
                "broker password and receive desired states in the clear.",
                hint="Set it to the broker's TLS listener, e.g. mqtts://broker.example.com:8883.",
                id="fleet.W001",
            )
        )
    if not settings.PUBLIC_BASE_URL.startswith("https://"):
        problems.append(
            CheckWarning(
                f"PUBLIC_BASE_URL ({settings.PUBLIC_BASE_URL}) is not HTTPS: devices would send "
                "their bearer token and download artifacts in the clear.",
                hint="Serve the control plane behind TLS and give its https:// URL.",
                id="fleet.W002",
            )
        )
    return problems
