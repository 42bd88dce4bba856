from dlrm_serve.cli import main

raise SystemExit(main())
