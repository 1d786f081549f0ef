from serve_app.batch.job import main

raise SystemExit(main())
