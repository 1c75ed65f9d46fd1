"""Run by QGIS's own Python, with the plugin as a zip install put it (argv[1]: the
profile's plugins folder): press 'Create environment' as the dock does (plan_env +
CreateEnvTask in QGIS's task manager), then look for the engine as the dock does.
Prints one JSON report."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qgis.core import QgsApplication

sys.path.insert(0, sys.argv[1])
app = QgsApplication([], False)
app.initQgis()

import landcover_plugin  # noqa: E402 (from the profile's plugins folder, after QGIS starts)
from landcover_plugin.core.engine_env import (check_engine, plan_env, requirement_files, user_venv,  # noqa: E402
                                              validate_engine_python)
from landcover_plugin.core.locate import engine_location, user_data_dir  # noqa: E402
from landcover_plugin.core.setup_task import CreateEnvTask  # noqa: E402

report = {"plugin": landcover_plugin.__file__, "profile": str(user_data_dir()),
          "before": check_engine(engine_location())}
plan = plan_env(user_venv(user_data_dir()), requirement_files())
report["commands"] = plan.commands
done, percents, stages = [], [], []
task = CreateEnvTask(plan, lambda ok, message: done.append((ok, message)))
start = time.monotonic()
task.progressChanged.connect(percents.append)
task.stageChanged.connect(lambda text: stages.append((round(time.monotonic() - start, 1), text)))
QgsApplication.taskManager().addTask(task)
while not done:
    app.processEvents()
    time.sleep(0.05)
report |= {"ok": done[0][0], "message": done[0][1], "seconds": round(time.monotonic() - start, 1),
           "percents": percents, "stages": stages}
location = engine_location()
report |= {"python": str(location.python), "origin": location.origin, "after": check_engine(location),
           "validated": validate_engine_python(location.python)[1]}
print(json.dumps(report))
app.exitQgis()
