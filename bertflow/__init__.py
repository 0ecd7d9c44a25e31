"""bertflow, the library: everything the stages (tasks/) and flows (flows/) reuse. It never imports a stage."""
