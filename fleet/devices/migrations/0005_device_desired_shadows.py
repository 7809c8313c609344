from django.db import migrations, models
from django.db.models.functions import Cast


class Migration(migrations.Migration):
    dependencies = [("devices", "0004_partition_schedule")]

    operations = [
        migrations.AddField(
            model_name="device",
            name="desired_shadows",
            field=models.JSONField(
                blank=True,
                default=dict,
                db_default=Cast(models.Value("{}"), models.JSONField()),
                help_text='model -> {"artifact": id, "sample_rate": 0..1}',
            ),
        ),
    ]
