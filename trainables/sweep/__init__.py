"""The sweep engine, in named parts: ``cli`` (the arguments every sweep script shares and
``main``), ``checks`` (input checks before anything is written), ``searcher`` (TPE in Ray's
OptunaSearch), ``scheduler`` (ASHA and the stall rule), ``run`` (one sweep end to end),
``tracking`` (every MLflow write), ``report`` (the summary) and ``methods`` (name -> method)."""
