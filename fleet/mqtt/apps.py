from django.apps import AppConfig


class MqttConfig(AppConfig):
    name = "fleet.mqtt"
    label = "mqtt"
    verbose_name = "MQTT broker"
