"""`make demo` (python -m scripts.demo): the control plane end to end on this machine.

The steps, in order (each a function with its own docstring; `python -m scripts.demo
--steps` lists them):

1. set up the services: a fresh PostgreSQL database (``DEMO_DATABASE_URL``, default
   ``modelfleet_demo``), a Mosquitto with the project's config and a TLS listener, the web
   app, a Celery worker and beat, the ingest bridge (PostgreSQL and Redis themselves are
   started by scripts/with-services.sh when missing);
2. upload digits 1.0.0 as float32 and int8 through the HTTP API and show the registry's
   view (size, compression, golden-set accuracy, signed manifest);
3. start twelve real agents (ten int8, two float32) that enroll, install 1.0.0 over TLS and
   answer predict; the control plane sees them online;
4. with ``DEMO_DEVICES=N`` only: a simulated fleet of N devices (``python -m agent.sim``)
   beside them, enrolled, active on 1.0.0, and in every rollout after;
5. upload 2.0.0, 3.0.0 and 4.0.0, create the rollout policies, start the apps that post labels;
6. roll out 2.0.0 in stages: it completes;
7. roll out 3.0.0 as a canary: the accuracy gate rolls it back;
8. run 4.0.0 in shadow: the agreement gate stops it before it serves a request;
9. report: what each device serves, and where to look in the admin;
10. keep everything running until Ctrl-C (``DEMO_EXIT=1``: stop right away, for tests), then
    clean up: every process started is stopped, the broker too, and the database dropped.

``DEMO_UNTIL=STEP`` (a step's function name, e.g. ``rollout_v2``) runs the steps up to that
one, then keeps running (or stops, with ``DEMO_EXIT=1``). State and logs go to var/demo
(``DEMO_VAR_DIR``); the port is 8000 or a free one (``DEMO_PORT``); Redis databases 14
(Celery) and 12 (cache, ``DEMO_CACHE_URL``).
"""
