"""The trigger service: functions run on records of any topic, and on cron schedules."""
