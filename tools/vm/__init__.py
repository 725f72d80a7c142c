"""Layer: tools (VM root disks and boots).  ``image`` builds the bootable base image
(tools/mkbase), ``boot`` boots qemu from a cowd disk and times it (tools/vm-boot), and
``guest/`` holds the two init scripts that run inside the VM."""
