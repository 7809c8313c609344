import django.core.validators
from django.db import migrations, models

import fleet.devices.models


class Migration(migrations.Migration):
    """Device ids that name a broker service account are refused (issue 9, section 1)."""

    dependencies = [("devices", "0005_device_desired_shadows")]

    operations = [
        migrations.AlterField(
            model_name="device",
            name="device_id",
            field=models.CharField(
                max_length=128,
                unique=True,
                validators=[
                    django.core.validators.RegexValidator(
                        "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
                        "Use letters, digits, '.', '_' or '-' (at most 128 characters).",
                    ),
                    fleet.devices.models.validate_device_id_not_reserved,
                ],
            ),
        ),
    ]
