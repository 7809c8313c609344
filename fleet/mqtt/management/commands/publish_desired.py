from django.core.management.base import BaseCommand, CommandError

from fleet.core.errors import ServiceError
from fleet.mqtt.broker import BrokerError
from fleet.mqtt.publisher import publish_desired
from fleet.registry import selectors, services
from fleet.registry.choices import ArtifactStatus


class Command(BaseCommand):
    help = (
        "Sign and publish (retained) a desired state naming one model version for each DEVICE. "
        "Rollouts do this for you; this command is for bring-up and demos. The generation must "
        "exceed what each device applied (agents refuse older ones as replays)."
    )

    def add_arguments(self, parser):
        parser.add_argument("devices", nargs="+", metavar="DEVICE")
        parser.add_argument("--model", required=True)
        parser.add_argument("--model-version", dest="model_version", required=True, metavar="VERSION")
        parser.add_argument("--variant", required=True, help="e.g. float32 or int8")
        parser.add_argument("--generation", type=int, required=True)

    def handle(self, *args, devices, model, model_version, variant, generation, **options):
        try:
            found = selectors.version_get(model_name=model, version=model_version)
            artifact = found.artifacts.filter(variant=variant, status=ArtifactStatus.READY).first()
            if artifact is None:
                raise CommandError(f"{found} has no ready {variant!r} artifact.")
            envelopes = [
                (
                    device,
                    services.desired_state_envelope(
                        device_id=device, generation=generation, artifacts={model: artifact}
                    ),
                )
                for device in devices
            ]
            count = publish_desired(envelopes)
        except (ServiceError, BrokerError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"published {count} desired state(s): {model} {model_version} [{variant}], generation {generation}"
        )
