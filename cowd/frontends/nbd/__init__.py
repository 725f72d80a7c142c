"""The NBD frontend: ``protocol`` (sans-I/O codec), ``server`` (trio adapter), ``attach``
(the kernel nbd client on /dev/nbdN).  Imports nothing, so the codec stays free of trio."""
