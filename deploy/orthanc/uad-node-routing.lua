-- Orthanc -> uad-node routing, for Orthanc's built-in Lua engine (no plug-in needed).
--
-- Load it with  "LuaScripts" : [ "/etc/orthanc/uad-node-routing.lua" ]  in Orthanc's configuration, and
-- declare the node in "DicomModalities" as "uadnode" (see orthanc.json beside this file).
--
-- When an MR series has been stable for "StableAge" seconds (Orthanc's setting: no new instance in that
-- time), Orthanc sends the whole series to the node as an asynchronous job. Only MR is forwarded: the
-- node's results come back to Orthanc as SEG, OT (Secondary Capture) and SR series and are never sent to
-- the node again, so there is no loop. The node decides for itself which MR series it analyses (its
-- [selection] rules) and waits for its own quiet period, so forwarding every MR series is safe.
--
-- A transfer that fails (node down) leaves a failed job in Orthanc: list them with
-- GET /jobs?expand and send again with POST /jobs/{id}/resubmit. The node acknowledges an image it
-- already holds without storing it twice.

local NODE = 'uadnode'  -- the key of the node in DicomModalities

function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] ~= 'MR' then
    return
  end
  local request = { Resources = { seriesId }, Asynchronous = true }
  local job = ParseJson(RestApiPost('/modalities/' .. NODE .. '/store', DumpJson(request, true)))
  print('uad-node routing: MR series ' .. seriesId .. ' -> ' .. NODE .. ' (job ' .. job['ID'] .. ')')
end
