from django.core.management.base import BaseCommand, CommandError

from fleet.core.errors import ServiceError
from fleet.devices.models import Device
from fleet.devices.services import devices_assign
from fleet.mqtt.broker import BrokerError
from fleet.registry import selectors
from fleet.registry.choices import ArtifactStatus


class Command(BaseCommand):
    help = (
        "Assign one model version to DEVICEs: give each a new desired generation, sign it and "
        "publish it retained. Rollouts do this for you; this command is for bring-up and demos."
    )

    def add_arguments(self, parser):
        parser.add_argument("devices", nargs="+", metavar="DEVICE")
        parser.add_argument("--model", required=True)
        parser.add_argument("--model-version", dest="model_version", required=True, metavar="VERSION")
        parser.add_argument("--variant", required=True, help="e.g. float32 or int8")

    def handle(self, *args, devices, model, model_version, variant, **options):
        found = Device.objects.filter(device_id__in=devices)
        missing = sorted(set(devices) - {device.device_id for device in found})
        if missing:
            raise CommandError(f"Unknown device(s): {', '.join(missing)}. Enroll them first.")
        try:
            version = selectors.version_get(model_name=model, version=model_version)
            artifact = version.artifacts.filter(variant=variant, status=ArtifactStatus.READY).first()
            if artifact is None:
                raise CommandError(f"{version} has no ready {variant!r} artifact.")
            assigned = devices_assign(devices=list(found), artifacts={model: artifact}, publish="now")
        except (ServiceError, BrokerError) as exc:
            raise CommandError(str(exc)) from exc
        for device_id, generation in assigned:
            self.stdout.write(f"{device_id}: {model} {model_version} [{variant}], generation {generation}")
