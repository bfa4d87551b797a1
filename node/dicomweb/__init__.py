"""DICOMweb: STOW-RS out (a ``type = "dicomweb"`` destination of the sender) and STOW-RS in.

``multipart`` reads and writes multipart/related bodies, ``stow_status`` the PS3.18 dicom+json
response, ``stow_client`` posts result files to a destination (network only), ``stow_rs`` stores
what a STOW-RS request carries through the same path as C-STORE.
"""
