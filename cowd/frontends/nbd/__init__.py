"""The NBD frontend: the sans-I/O codec in two parts, ``wire`` (constants, struct layouts,
limits, errors, events, reply builders) and ``protocol`` (the connection state machine);
``server`` (the trio adapter); ``attach`` (the kernel nbd client on /dev/nbdN).  Imports
nothing, so the codec stays free of trio."""
