from hpc_retrain.cli import main

raise SystemExit(main())
