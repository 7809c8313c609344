"""Provisioning the broker for the control plane: the one place that says what it holds.

What the broker must hold before anything connects (docs/mqtt.md, "Provisioning"):

* default deny: whatever no role grants is refused (publish, receive, subscribe);
* one role per service account, with exactly the topics it needs
  (``fleet-publisher``: write desired states and the trust bundle; ``fleet-ingest``: read
  the devices' four topics, also through the shared subscription, and ask for replays);
* the service accounts themselves, with passwords the operator supplies.

``broker_plan`` builds that state as data; a ``BrokerProvisioner`` makes a broker match it,
idempotently. Mosquitto's dynamic security plugin (``fleet.mqtt.broker.DynSec``) is the one
implementation; an adapter for a clustered broker (EMQX, HiveMQ, VerneMQ: docs/mqtt.md,
"Another broker") implements the same one method against its own API. ``manage.py
broker_provision``, the demo, the tests and the benchmarks all call ``broker_provision``.

Imports no Django: the benchmarks and the agent's tests use it without settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from agent.protocol.topics import DESIRED, DEVICE_TOPICS, INGEST_SHARE_GROUP, Topics

PUBLISHER_ROLE = "fleet-publisher"
INGEST_ROLE = "fleet-ingest"
PUBLISHER_USERNAME = "fleet-publisher"
INGEST_USERNAME = "fleet-ingest"


class AclType(StrEnum):
    """What an ACL entry grants (Mosquitto dynamic-security's names)."""

    PUBLISH_SEND = "publishClientSend"
    PUBLISH_RECEIVE = "publishClientReceive"
    SUBSCRIBE_LITERAL = "subscribeLiteral"
    SUBSCRIBE_PATTERN = "subscribePattern"


@dataclass(frozen=True, order=True)
class Acl:
    type: AclType
    topic: str


@dataclass(frozen=True)
class ServiceAccount:
    username: str
    password: str = field(repr=False)
    role: str


@dataclass(frozen=True)
class BrokerPlan:
    """The broker's provisioned state: default deny, these roles, these accounts."""

    roles: dict[str, frozenset[Acl]]
    accounts: tuple[ServiceAccount, ...]


class BrokerProvisioner(Protocol):
    def provision(self, plan: BrokerPlan) -> list[str]:
        """Make the broker hold exactly ``plan`` for its roles and accounts, with default
        deny; change nothing that already matches (a second run changes nothing). Returns
        what changed, in words, without secrets. Checks everything it can before the first
        change, and raises ``BrokerError`` (changing nothing) when the plan cannot apply."""
        ...


def service_roles(topics: Topics) -> dict[str, frozenset[Acl]]:
    prefix = topics.prefix
    device_topics = [f"{prefix}/devices/+/{kind}" for kind in DEVICE_TOPICS]
    return {
        PUBLISHER_ROLE: frozenset(
            {
                Acl(AclType.PUBLISH_SEND, f"{prefix}/devices/+/{DESIRED}"),
                Acl(AclType.PUBLISH_SEND, topics.trust()),
            }
        ),
        INGEST_ROLE: frozenset(
            {
                *[
                    Acl(AclType.SUBSCRIBE_PATTERN, f"$share/{INGEST_SHARE_GROUP}/{topic}")
                    for topic in device_topics
                ],
                *[Acl(AclType.SUBSCRIBE_PATTERN, topic) for topic in device_topics],
                *[Acl(AclType.PUBLISH_RECEIVE, topic) for topic in device_topics],
                Acl(AclType.PUBLISH_SEND, topics.replay()),
            }
        ),
    }


def broker_plan(
    *,
    topics: Topics,
    publisher_password: str,
    ingest_password: str,
    publisher_username: str = PUBLISHER_USERNAME,
    ingest_username: str = INGEST_USERNAME,
) -> BrokerPlan:
    for name, password in (("publisher", publisher_password), ("ingest", ingest_password)):
        if not password:
            raise ValueError(f"the {name} account needs a password")
    return BrokerPlan(
        roles=service_roles(topics),
        accounts=(
            ServiceAccount(publisher_username, publisher_password, PUBLISHER_ROLE),
            ServiceAccount(ingest_username, ingest_password, INGEST_ROLE),
        ),
    )


def broker_provision(
    broker: BrokerProvisioner,
    *,
    topics: Topics,
    publisher_password: str,
    ingest_password: str,
    publisher_username: str = PUBLISHER_USERNAME,
    ingest_username: str = INGEST_USERNAME,
) -> list[str]:
    """Default deny, the service accounts and their roles on ``broker``; what changed."""
    return broker.provision(
        broker_plan(
            topics=topics,
            publisher_password=publisher_password,
            ingest_password=ingest_password,
            publisher_username=publisher_username,
            ingest_username=ingest_username,
        )
    )
