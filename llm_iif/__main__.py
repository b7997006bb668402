from llm_iif.cli import main

raise SystemExit(main())
