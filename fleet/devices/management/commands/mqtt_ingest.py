import signal
import socket
import threading

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from fleet.core.metrics import ingest_metrics_serve
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
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=settings.INGEST_METRICS_PORT,
            metavar="PORT",
            help="Serve Prometheus metrics on this port (default INGEST_METRICS_PORT; 0: off).",
        )
        parser.add_argument(
            "--metrics-addr",
            default=settings.INGEST_METRICS_ADDR,
            metavar="ADDRESS",
            help="The address the metrics port binds to (default INGEST_METRICS_ADDR).",
        )

    def handle(self, *args, client_id, session_expiry, stats_interval, metrics_port, metrics_addr, **options):
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        bridge = IngestBridge(
            client_id=client_id, session_expiry_s=session_expiry, stats_interval_s=stats_interval
        )
        stop_metrics = None
        if metrics_port:
            try:
                stop_metrics = ingest_metrics_serve(bridge, port=metrics_port, addr=metrics_addr)
            except OSError as exc:
                raise CommandError(f"cannot serve metrics on {metrics_addr}:{metrics_port}: {exc}") from exc
            self.stdout.write(
                f"ingest bridge {client_id}: metrics on http://{metrics_addr}:{metrics_port}/metrics"
            )
        try:
            counters = bridge.run(stop)
        except IngestError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            if stop_metrics:
                stop_metrics()
        self.stdout.write(f"ingest bridge {client_id} stopped: {counters.summary()}")
