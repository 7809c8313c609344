import signal
import socket
import threading

from django.core.management.base import BaseCommand, CommandError

from fleet.devices.ingest import SESSION_EXPIRY_S, IngestBridge, IngestError


class Command(BaseCommand):
    help = (
        "Run the ingest bridge: device status, reported state, events and telemetry from MQTT "
        "into PostgreSQL, until SIGTERM or SIGINT. Several bridges may run at once (each with "
        "its own --client-id); they split the load through the shared subscription."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--client-id",
            default=f"fleet-ingest-{socket.gethostname()}",
            help="MQTT client id; a bridge restarted with the same id resumes its session.",
        )
        parser.add_argument(
            "--session-expiry",
            type=int,
            default=SESSION_EXPIRY_S,
            metavar="SECONDS",
            help="How long the broker keeps this bridge's session (and its share) while it is away.",
        )
        parser.add_argument("--stats-interval", type=float, default=60.0, metavar="SECONDS")

    def handle(self, *args, client_id, session_expiry, stats_interval, **options):
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        bridge = IngestBridge(
            client_id=client_id, session_expiry_s=session_expiry, stats_interval_s=stats_interval
        )
        try:
            counters = bridge.run(stop)
        except IngestError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"ingest bridge {client_id} stopped: {counters.summary()}")
