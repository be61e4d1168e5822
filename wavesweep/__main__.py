from wavesweep.cli import main

raise SystemExit(main())
