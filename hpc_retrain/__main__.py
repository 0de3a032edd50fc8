from hpc_retrain.commands import main

raise SystemExit(main())
