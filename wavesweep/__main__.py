from wavesweep.cli import run

run()
