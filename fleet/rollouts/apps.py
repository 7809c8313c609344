from django.apps import AppConfig


class RolloutsConfig(AppConfig):
    name = "fleet.rollouts"
    label = "rollouts"
    verbose_name = "Rollouts"
