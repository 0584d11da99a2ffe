from raypurify.cli import main

raise SystemExit(main())
